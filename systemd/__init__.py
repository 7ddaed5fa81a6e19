"""The systemd unit files (package data, importable as ``haloae.systemd``), so an installed
package can write them out: ``haloae-config systemd/haloae-edge@.service``. This file only
makes the folder a package; the unit files are the content.
"""
