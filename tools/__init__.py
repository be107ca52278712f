"""Scripts run around the method: data preparation, the synthetic set, pictures,
features and probes, tables, converters, benchmarks and the GPU check.

Run each as `python tools/NAME.py ...` from the repository root. They import
the seven component files; none of those imports anything from here.
"""
