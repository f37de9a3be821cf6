"""faceage's MTCNN: facenet-pytorch's nets, weights and algorithm, faster and without it.

``load_nets()`` (nets.py; the weights ship in this folder, see LICENSE-facenet-pytorch) and
``detect_faces(image, nets, min_face, thresholds, factor)`` (detect.py; the box arithmetic in
boxes.py, the pyramid and the batched crops in resample.py). Imports torch: code the Serve
Ingress loads imports it inside functions only.
"""

from faceage.inference.mtcnn.detect import detect_faces, pyramid_scales
from faceage.inference.mtcnn.nets import MtcnnNets, load_nets

__all__ = ["MtcnnNets", "detect_faces", "load_nets", "pyramid_scales"]
