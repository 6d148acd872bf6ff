"""Model families: ``family.py`` is the interface and registry (``family_of(model)``, ``patched``); each family is one
file (or a few, with its checkpoint reading beside it): ``timm_family.py`` (+ ``timm_vit*.py``), ``hf_vit*.py``,
``open_clip_vit.py``. Code outside ``models/`` uses ``family.py`` and ``loading.py`` only."""
