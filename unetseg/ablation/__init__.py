"""Skip-connection studies: the same training code with model fields flipped, then analysed.

Modules: ``study`` (study YAML), ``variants`` (the matrix as config overrides),
``runs`` (one run folder: state, per-case scores), ``runner`` (resumable
``unetseg ablate``), ``landscape`` (filter-normalised loss slices), ``lesion``
(test-time lesions), ``qualitative`` (saved prediction slices), ``gradients``
(per-layer gradient profiles), ``stats`` (paired tests), ``figures`` and
``report`` (everything redrawn from saved artefacts).
"""
