"""tritium.serve"""
