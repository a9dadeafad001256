"""Visualisations of what a DeepCluster convnet learned and of how training went.

Modules: ``gradient_ascent`` (synthetic images maximising each filter of a conv layer),
``activ-retrieval`` (the images of a dataset that activate each filter most; the dash in
the name means it is loaded with importlib), ``report`` (training curves and cluster
pictures from an experiment folder).
"""
