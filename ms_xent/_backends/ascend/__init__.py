"""The Ascend backend: the vendor operators (CANN aclnn) through MindSpore's built-in primitives or
``ops.Custom(func="aclnnXxx")``."""
