"""ArchitectureSearch: API models, algorithms, memory planner, the pure search engine and reports.

torch-free and kopf-free: the operator and ``kubearch search`` (local processes) run this same code.
"""
