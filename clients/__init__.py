"""Flower ClientApp: decodes messages, calls the device handlers of ``fedsparse.federation.protocol``, encodes replies."""
