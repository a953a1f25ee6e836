"""tritium.align"""
