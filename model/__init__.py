"""tritium.model"""
