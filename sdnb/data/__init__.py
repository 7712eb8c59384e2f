"""Files on disk: image folders (scan, load, split, training copies), captions (sidecars and metadata.jsonl),
verified downloads, safe archive extraction and the data manifest."""

from sdnb.data.captions import CaptionedImage, read_caption, read_captions, save_caption
from sdnb.data.images import ImageRecord, find_images, load_rgb, scan, split_by_image, to_array, to_tensor

__all__ = ["CaptionedImage", "ImageRecord", "find_images", "load_rgb", "read_caption", "read_captions",
           "save_caption", "scan", "split_by_image", "to_array", "to_tensor"]
