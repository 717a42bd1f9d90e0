"""Evaluation: FID (Inception, XRV DenseNet, thumbnails, scene features), Inception Score, MS-SSIM, CLIP-Score, the
one distributed eval runner for every backbone, and the in-training evaluation."""
