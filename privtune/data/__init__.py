"""Data layer: sources (embedded, imagefolder, hub), validation, member / non-member split, transforms."""
