"""The names of the data sets unetseg knows, in one place (no imports: the CLI's ``--help`` reads them).

``unetseg.data.datasets.DATASETS`` describes each; ``unetseg.data.download.ARCHIVES`` holds the public ones'
archives (a test keeps the three in step).
"""

PUBLIC_DATASETS = ("hippocampus", "dsb2018")  # public: downloadable, and offered as sample cases in the viewer
DATASET_NAMES = (*PUBLIC_DATASETS, "folder")  # plus "folder": any paired images/ + masks/ folder
