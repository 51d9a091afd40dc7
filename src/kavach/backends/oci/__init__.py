"""OCI backends: runc/crun containers (:class:`OciDriver`) and gVisor's runsc (:class:`GVisorDriver`).

See ``docs/oci.md`` for the design: the bundle, the user namespace, the in-sandbox launcher
and the composite inner layer.
"""

from kavach.backends.oci.driver import GVisorDriver, OciDriver, OciInstance
from kavach.backends.oci.image import DirectoryRootfs, HostRootfs, ImageRootfs

__all__ = ["DirectoryRootfs", "GVisorDriver", "HostRootfs", "ImageRootfs", "OciDriver", "OciInstance"]
