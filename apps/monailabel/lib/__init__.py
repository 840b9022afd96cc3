"""The app's infer task: a bundle of the collection registering an atlas onto the request's image."""

from .registration import BundleRegistrationTask, discover_bundles

__all__ = ["BundleRegistrationTask", "discover_bundles"]
