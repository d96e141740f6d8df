"""The store formats, one subpackage each (``zarr``, ``wds``, ``h5``), found by name through
:mod:`scatstore.stores.registry`. Each subpackage holds its writer, map-style reader, bulk reader
and verifier side by side and exports them as one ``FORMAT``; none imports another."""
