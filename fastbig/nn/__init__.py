"""Drop-in modules with torch.nn's signatures and state_dict keys."""
__all__ = []
