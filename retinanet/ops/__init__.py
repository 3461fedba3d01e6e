"""Pure tensor operations that every detector shares: box math, anchors, matching, NMS, dense post-processing."""
