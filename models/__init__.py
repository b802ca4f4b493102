"""Model code shared by pretraining and every evaluation. Imports nothing from the rest of the repo."""
from .heads import ProjectionHead
from .teachers import TEACHERS, Teacher, build_teacher
from .vit import VIT_SIZES, DinoVisionTransformer, build_student, build_vit
from .weights import backbone_state_dict, load_backbone, load_state_dict_checked, read_checkpoint

__all__ = ["DinoVisionTransformer", "ProjectionHead", "Teacher", "TEACHERS", "VIT_SIZES", "backbone_state_dict",
           "build_student", "build_teacher", "build_vit", "load_backbone", "load_state_dict_checked",
           "read_checkpoint"]
