"""Image-quality evaluation: windowed PSNR / SSIM / RMSE and uniform-region HU bias / noise statistics."""
from .metrics import (
    CT_WINDOWS,
    UniformRegionStats,
    Window,
    evaluate_windows,
    find_uniform_regions,
    mr_window,
    psnr,
    psnr_from_squared_error,
    rmse,
    squared_error_sum,
    ssim,
    uniform_region_statistics,
    window_for,
)

__all__ = [
    "CT_WINDOWS",
    "UniformRegionStats",
    "Window",
    "evaluate_windows",
    "find_uniform_regions",
    "mr_window",
    "psnr",
    "psnr_from_squared_error",
    "rmse",
    "squared_error_sum",
    "ssim",
    "uniform_region_statistics",
    "window_for",
]
