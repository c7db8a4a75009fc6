"""The real images the generator learns from, and the one on-disk form every job reads them in.

labeled (LabeledImages, the in-memory form every source is read into), sources (image folders, MedMNIST
.npz files, the IHC smoke set), procedural, cells and raster (procedural bone-marrow cells drawn to the
checklist's ranges), make (any source into a data set), shards (the directory of Parquet shards, its
split, guards and readers). Nothing heavy is imported here.
"""
