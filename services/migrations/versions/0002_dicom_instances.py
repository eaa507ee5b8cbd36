"""dicom_instances index

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dicom_instances",
        sa.Column("SOPInstanceUID", sa.String(64), primary_key=True),
        sa.Column("SOPClassUID", sa.String(64), nullable=False),
        sa.Column("StudyInstanceUID", sa.String(64), nullable=False, index=True),
        sa.Column("SeriesInstanceUID", sa.String(64), nullable=False, index=True),
        sa.Column("PatientID", sa.String(64), index=True),
        sa.Column("IssuerOfPatientID", sa.String(64)),
        sa.Column("Modality", sa.String(16)),
        sa.Column("StudyDate", sa.String(8)),
        sa.Column("InstanceNumber", sa.Integer()),
        sa.Column("TransferSyntaxUID", sa.String(64)),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("dicom_instances")
