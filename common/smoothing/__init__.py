from .rkhs import RKHSSmoother, laplacian_eigenvalues

__all__ = ["RKHSSmoother", "laplacian_eigenvalues"]
