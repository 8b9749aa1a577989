"""`fastmirror bench`: fastmirror side by side with dd, qemu-img convert,
QEMU's mirror job and fio's ceilings on the same files or devices."""
