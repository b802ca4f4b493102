"""Model code shared by pretraining and every evaluation. Imports nothing from the rest of the repo."""
from .heads import ProjectionHead
from .teachers import (TEACHER_FAMILIES, TEACHERS, Teacher, TeacherFamily, TeacherSpec, build_teacher, check_summary_index,
                       teacher_family, teacher_spec)
from .timm_student import TimmStudent, is_timm_name, resample_grid, timm_model_keys
from .vit import STUDENTS, VIT_SIZES, DinoVisionTransformer, build_student, build_vit, parse_size_kwargs
from .weights import backbone_state_dict, load_backbone, load_state_dict_checked, read_checkpoint

__all__ = ["DinoVisionTransformer", "ProjectionHead", "STUDENTS", "Teacher", "TeacherSpec", "TEACHERS", "TEACHER_FAMILIES", "TeacherFamily", "teacher_family",
           "TimmStudent", "VIT_SIZES", "backbone_state_dict", "is_timm_name", "parse_size_kwargs", "resample_grid", "teacher_spec",
           "build_student", "build_teacher", "check_summary_index", "build_vit", "load_backbone", "load_state_dict_checked",
           "read_checkpoint"]
