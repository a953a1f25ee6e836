"""tritium.bench"""
