"""The progress callback every long step takes: ``progress(fraction done in [0, 1], message)``.

The CLI drives a tqdm bar with it, the app a Gradio progress bar; the library never prints.
"""

from collections.abc import Callable

Progress = Callable[[float, str], None]
