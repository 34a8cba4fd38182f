"""kdlab: knowledge distillation on Lightning + Hydra.

A *scheme* (offline, online, self) says where the knowledge comes from; a *knowledge*
module (response, feature, relation) says what is transferred. Any knowledge works in
any scheme; `python -m kdlab.run` composes both from the Hydra config tree in `conf/`.
"""

__version__ = "0.1.0"
