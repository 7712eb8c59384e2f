"""Stage 01, captioning: BLIP captions for a folder of photos, training copies with `.txt` sidecars and
`metadata.jsonl`, a settings sweep and a reviewer. The verbs 01_captioning calls."""

from sdnb.caption.config import CaptionConfig
from sdnb.caption.data import CaptionResult, caption_folder
from sdnb.caption.model import Captioner, load_captioner
from sdnb.caption.plot import captions_html
from sdnb.caption.review import CaptionReviewer, review
from sdnb.caption.sweep import SweepTable, sweep

__all__ = ["CaptionConfig", "CaptionResult", "CaptionReviewer", "Captioner", "SweepTable", "caption_folder",
           "captions_html", "load_captioner", "review", "sweep"]
