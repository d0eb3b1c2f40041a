"""A plugin file that fails at import: the host must report it and carry on."""
import a_module_that_does_not_exist  # noqa: F401
