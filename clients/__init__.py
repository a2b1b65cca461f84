"""Flower ClientApp: decodes messages, calls the device handlers of ``fedsparse.protocol``, encodes replies."""
