"""The analysis tools of this repository: `python -m tools.NAME` from its root.

    python -m tools.iou_curve A/backbone.pth B/backbone.pth   # DUPR Fig. 6 (eq. 9) and Fig. 7
    python -m tools.readout   A/backbone.pth B/backbone.pth   # InsLoc Table 3a readouts, view retrieval
    python -m tools.diagnose  A/backbone.pth                  # DiLo Fig. 2/5: neighbours, input gradients
    python -m tools.toy_world OUT N                           # the toy world as files + COCO json
    python -m tools.benchmark [--tiny]                        # every trainer's step time and memory vs MoCo v2

They may import the trainers (a method's view geometry); the trainers import nothing from here.
"""
import os
import sys

# NOTE: oneDNN caches a compiled primitive per input shape (up to 1024 of them). The analysis tools
#   feed images of many sizes, so the cache grew the readout's memory with the number of images
#   (docs/analysis.md, "Memory and progress"); one entry keeps it flat. oneDNN reads the variable
#   when torch loads, so it is set here, before the tool imports torch, and only for a command
#   (`python -m tools.NAME`: sys.argv[0] is "-m" while Python finds the module), not on import.
if sys.argv[:1] == ["-m"]:
    os.environ.setdefault("LRU_CACHE_CAPACITY", "1")
