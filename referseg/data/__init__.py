"""Data: REFER-format datasets (ReferIt, RefCOCO family, SynthRef), text and transforms."""
