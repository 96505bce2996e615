"""megatron_endprompt: long-context extension of RoPE models with EndPrompt terminal anchoring.

Built on megatron-core. See README.md and the module docstrings of ``positions``,
``data.dataset``, ``model.rotary`` and ``training.loop``.
"""

__version__ = "0.1.0"
