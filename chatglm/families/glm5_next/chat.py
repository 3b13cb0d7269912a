"""GLM-5.3-Flash chat prompts: no format of its own here yet.

The converter names the GLM-4.5 format (``glm45``, defined by ``glm4_moe``) in the GGUFs it writes; GLM-5.3-Flash's
own template, token-exact, comes with the chat work of issue #18.
"""

FORMATS = ()
