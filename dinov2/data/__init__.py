"""The data path of a volume, from its datalist entry to a training batch, all in this package.

Datalists (:mod:`.datalist`) -> headers and readers (:mod:`.image_io`, :mod:`.readers`) ->
cacheable preprocessing (:mod:`.transforms`, :mod:`.datasets`) -> crops and augmentations
(:mod:`.crops`, :mod:`.augmentations`) -> iBOT masks (:mod:`.masking`) -> batches
(:mod:`.collate`) -> the global, position-seeded training stream (:mod:`.samplers`,
:mod:`.seeding`, :mod:`.loader`).
"""
