"""A plugin file that kills its interpreter with SIGSEGV while it is imported."""
import ctypes

ctypes.string_at(0)
