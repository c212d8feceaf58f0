"""The application on top of the library: training, the demo, data.

- :mod:`.training`       the training loop every task shares; the demo's packaged-model tasks
- :mod:`.user_training`  fit / evaluate on a user's prepared rows (``shirakit train --data``)
- :mod:`.user_data`      a user's own data files, read and prepared with ``datasets``
- :mod:`.data`           the packaged real models and data (public path: ``shirakit.data``)
- :mod:`.demo`           ``shirakit demo``
- :mod:`.figures`        the AWOR heatmap
"""
