"""Tiny checkpoints built offline from configs: a random-weight LLaVA (:mod:`vlmflow.tiny.llava`,
``vlmflow tiny-model``) and small trained tokenizers (:mod:`vlmflow.tiny.tokenizers`).

They let a user try vlmflow without downloading a checkpoint; the model organism starts from them.
"""
