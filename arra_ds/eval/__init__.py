"""Evaluation: FID (Inception, XRV DenseNet), MS-SSIM, CLIP-Score, the distributed eval runner and the
in-training evaluation."""
