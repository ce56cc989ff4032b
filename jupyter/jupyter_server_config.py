"""JupyterLab as the course runs it: `make lab` puts this folder on JUPYTER_CONFIG_PATH.

Your own settings (~/.jupyter) still win over these.
"""

import os
from pathlib import Path

c = get_config()  # noqa: F821 (defined by Jupyter when it loads this file)

# Rooted at the course folder: hints and chapter 00 send learners to solutions/, so it must
# open from the file browser; learners land in notebooks/.
c.ServerApp.root_dir = str(Path(__file__).resolve().parent.parent)
c.LabApp.default_url = "/lab/tree/notebooks"

# Containers and cloud VMs run as root, where JupyterLab otherwise stops with
# "Running as root is not recommended".
c.ServerApp.allow_root = hasattr(os, "geteuid") and os.geteuid() == 0

# No news feed (labconfig/page_config.json also turns off its pop-up, which covers every page).
c.LabApp.news_url = None
