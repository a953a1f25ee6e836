"""tritium.train"""
