"""GLM-4.1V/4.6V have no builder of their own: the GGUF carries the checkpoint's template, rendered by the sandboxed
Jinja path (``runtime/jinja_chat.py``), which gives each image the template's content part and so its
``<|begin_of_image|><|image|><|end_of_image|>`` (libmtmd's chunk takes the place of ``<|image|>``).

:func:`check_projector` is what libmtmd's ``glm4v`` loader and graph (tools/mtmd/clip.cpp, models/glm4v.cpp) need of
an mmproj file beyond the keys every projector has: the tower's tensors as the writer declares them (``tower.py``).
"""

from chatglm.families.glm4v.tower import check_tower

FORMATS = ()
check_projector = check_tower
