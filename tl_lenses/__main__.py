"""``python -m tl_lenses``: the ``tl-lenses`` command line, where the script is not on PATH.

From a notebook (``!python -m tl_lenses dla ...``) the kernel's interpreter runs it even
when its environment's ``bin`` folder, which holds ``tl-lenses``, is not on ``PATH``.
"""

import sys

from tl_lenses.cli import main

if __name__ == "__main__":
    sys.exit(main())
