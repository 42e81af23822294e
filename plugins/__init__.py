"""Built-in tokenpress methods. Each sub-package is an independent plugin, found through the
``tokenpress.plugins`` entry-point group like any third-party plugin."""
