"""The data layer, one direction of imports: ``split`` (the split hash) and ``readers`` (one
reader per format and ``FORMATS``, the registry of format names) -> ``prepare`` (detect-and-crop)
-> ``sources`` (a run's sources, their table and prepared cache) -> ``datasets`` (decode cache,
augmentation, datasets, samplers)."""
