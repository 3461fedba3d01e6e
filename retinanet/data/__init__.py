"""COCO-format data: image loading, validation, the dataset, transforms, loaders, synthetic shapes."""
