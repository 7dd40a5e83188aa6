"""Ptychography physics: probes, objects, scans, the forward model, iterative solvers and metrics.

Imports nothing else from edgeptycho.
"""
