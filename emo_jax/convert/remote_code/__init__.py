"""PyTorch sources copied next to exported weights (`--layout emo`), never imported by emo_jax.

`configuration_emo.py` and `modeling_emo.py` are plain files for transformers' remote-code
loader (`trust_remote_code=True`); they import torch and transformers, which emo_jax itself does
not need. They live in a package only so that `pip install` ships them.
"""
