"""PeRFlow (Piecewise Rectified Flow, arXiv 2405.07510) math in pure torch: no ComfyUI import."""
