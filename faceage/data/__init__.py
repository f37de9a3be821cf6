"""The data layer, one direction of imports: readers (one per format) -> detect-and-crop
(prepare) -> sources and their prepared cache -> decode cache, augmentation, samplers, datasets."""
