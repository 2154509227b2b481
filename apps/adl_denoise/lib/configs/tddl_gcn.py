"""TDDL-GCN (Chen, Pu, Ren et al.): graph-convolutional CT denoiser trained on pseudo pairs made with noise
learned from low-dose scans alone; CT only."""
from .base import DenoiserTaskConfig


class TDDLGCN(DenoiserTaskConfig):
    method = "TDDL-GCN (graph-convolutional denoiser, task-driven noise learning)"
    modalities = ("CT",)
