from .rkhs import RKHSSmoother, laplacian_eigenvalues, sine_basis

__all__ = ["RKHSSmoother", "laplacian_eigenvalues", "sine_basis"]
